from service.ops.cli import main

main()
