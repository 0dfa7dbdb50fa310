from qingzhou.cli.main import main

main()
