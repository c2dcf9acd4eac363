from onnxconet.cli import main

main()
