import os, signal
def test_fail_mounted(delafs_mount):
    m = delafs_mount(size="64M")
    f = open(m.path("busy"), "w")   # keeps the mount busy
    assert False, "deliberate"
def test_killed(delafs_mount):
    m = delafs_mount(size="64M")
    os.kill(m.pid, signal.SIGKILL)
    assert False, "deliberate 2"
def test_stopped(delafs_mount):
    m = delafs_mount(size="64M")
    os.kill(m.pid, signal.SIGSTOP)
    assert False, "deliberate 3"
