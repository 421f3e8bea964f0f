"""The device side: converge to desired state, verify, swap atomically, serve KServe V2.

Imported as ``edgectl.agent``. Never imports torch, ``edgectl.compress`` or
``edgectl.control_plane``: agents run on Jetsons and CPU boxes with their own stack.
"""
