"""The commands behind the CLI: each turns a config into library calls and a result (no printing, no typer).
The library never imports this package; `onnxconet.cli` is the only importer."""
