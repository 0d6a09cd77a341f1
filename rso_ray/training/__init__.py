"""The training layer, torch only (no Ray, no MLflow): one optimizer step and evaluation (engine), FSDP2
sharding (sharding), gradient-traffic counting (comm), data-parallel helpers (distributed), checkpoints
(checkpoint) and the storage they live on (storage). The benchmarks, the tests and the GPU suite use it
without a cluster; rso_ray.cluster drives it on Ray Train."""
