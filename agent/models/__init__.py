"""The model lifecycle on the device: bundles (``bundle``), the versioned store (``store``), one
slot per served model with the hot swap (``slots``) over loaded versions (``loaded``), probation
and its journal (``probation``), the update driver (``activation``), and the protocols the local
API and the inference loop serve through (``serving``).

Nothing here talks to the network: updates arrive through ``agent.updates``, and the API and
loop only see ``agent.models.serving``'s protocols.
"""
