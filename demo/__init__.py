"""The demos behind ``make demo``; they live beside the packages and are not installed.

- ``python -m demo.fleet`` (``make demo``): a control plane, a broker and three agent daemons, a
  model pushed and rolled out in waves with live swaps (``fleet``, with its processes in
  ``procs``, ``server``, ``agent_proc`` and ``broker``, its models in ``models`` and its live view
  in ``fleet_view``);
- ``python -m demo.local``: one agent's inference loop on two real models with a live latency
  table.
"""
