"""The descriptor pool of the KServe V2 / Triton protos (package ``inference``), not the default one.

The stock ``tritonclient.grpc`` registers the same message names (``inference.DataType``, ...) under
other file names in protobuf's default pool; two files defining one name in one pool fail to load.
``scripts/gen_protos.py`` points our generated V2 modules at this pool, so a process may import
both edgectl's agent and tritonclient, in either order. Messages are wire-identical either way.
"""

from google.protobuf import descriptor_pool

V2_POOL = descriptor_pool.DescriptorPool()
