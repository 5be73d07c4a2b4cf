"""TIR kernels and schedules for edgequant's exported models (TVM 0.27): low-bit dequantize + matmul, outlier
columns, the dlight rule sets per device, and the workarounds for this TVM wheel's crashes (all in `workarounds`)."""
