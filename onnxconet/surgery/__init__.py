"""Surgery from one plan, both sides: the torch module and the ONNX graph, cut to the same widths."""
