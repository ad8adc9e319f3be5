from minignext.cli import main

main()
