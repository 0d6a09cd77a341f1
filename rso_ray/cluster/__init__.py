"""The Ray and MLflow layer: the driver of a job (driver), the loop of each Ray Train worker (worker),
MLflow tracking (tracking), the one-writer lock of a run (runlock), the watcher that stops Ray's processes
when the driver dies (reaper) and the filter of Ray's console noise (ray_console). It drives the torch-only
rso_ray.training layer."""
