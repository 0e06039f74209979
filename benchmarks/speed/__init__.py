"""Speed: timings of the kernels, the train step, decoding, inference, data and the store (results/*.json)."""
