"""What a quantized model is made of: the fake quantizers (quantizer), QuantLinear (qlinear) and the input transforms
it applies (transforms, transform_kinds, hadamard, reassembly), quantized attention inputs (attention), and decoder
blocks run on their own, quantized or fused (blocks, qblock, fused, subblock).

May import: model, core's foundation.
"""
