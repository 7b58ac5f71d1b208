"""The vSphere lab: a simulated vCenter, real VMDK disks and guest endpoints on this machine.

``vbrd lab up`` / ``vbrd lab down`` (:mod:`vbrd.lab.cli`, :mod:`vbrd.lab.lab`) start and stop
it; the simulator is the govmomi vCenter simulator extended by the Go program in ``sim/``.
"""
