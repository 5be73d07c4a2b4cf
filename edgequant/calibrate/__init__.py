"""Calibration methods. Each turns a full-precision model into {linear name: QuantizedWeight}: `rtn` (no data),
`gptq` (OPTQ, layer-wise Hessians), `owq` and `omniquant`. `methods.METHODS` is the registry."""
