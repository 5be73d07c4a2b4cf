"""Calibration methods. Each turns a full-precision model into {linear name: QuantizedWeight}:
`rtn` (no data), `gptq` (OPTQ, layer-wise Hessians); later `omniquant` and `owq`. `METHODS` is the registry."""
