//! safetensors checkpoints (single file or sharded with an index), memory-mapped.
