"""Where and how this process runs: the device policy (`device`), process groups
(`parallel`), launcher discovery (`launch_env`) and the one module of CPU accommodations for
Megatron-Core (`cpu_compat`). Everything above this layer asks here instead of probing CUDA."""
