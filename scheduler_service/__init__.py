"""The scheduler service: the cluster's brain.

It holds the view of every request and worker (from gateways' submissions and delivery
reports and from workers' step reports), places requests on workers, and plans each worker
with the same policy objects the simulator runs (:func:`andes.policies.make_policy`). Tokens
never pass through it, and no worker iteration ever waits for it.
"""
