from inference_core.cli import main

main()
