"""The FUSE side (layer 1): the pyfuse3 adapter that turns requests into
filesystem and vfs calls, and the daemon that mounts an image and serves
it (options, signals, the control file).

    operations   Operations: the pyfuse3.Operations subclass
    daemon       Daemon: bring-up, serve, signals, shutdown
    options      MountOptions: -o parsed once into a typed record
    control      the control file's protocol, both sides
"""
