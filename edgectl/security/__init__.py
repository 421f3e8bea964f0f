"""Fleet security: the fleet CA, broker identities and ACLs, and bearer tokens for people and CI.

Shared by the control plane (issues credentials, checks tokens), the agent (uses them) and the
CLI (`edgectl broker config`). Crypto comes from `cryptography`; nothing here is hand-rolled.
"""
