# Fused loss and optimizer kernels (included into _core.pyx).
