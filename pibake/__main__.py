from pibake.cli import main

main()
