"""Descriptor pool of the generated modules, apart from the default pool that tritonclient fills."""

from google.protobuf import descriptor_pool

# Our inference.* subset shares file and message names with tritonclient's descriptors, which the
# default pool would reject as duplicates when both are loaded in one process.
POOL = descriptor_pool.DescriptorPool()
