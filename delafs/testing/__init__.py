"""Test machinery shipped with the package (as trio.testing is): the race
explorer and crash simulation.  Nothing in the runtime imports it; the
``delafs race`` command loads the explorer when it runs.

    race       the race explorer: scheduler, invariants, mutants, workloads
    crashsim   the images a power cut could leave, from a recorded stream
"""
