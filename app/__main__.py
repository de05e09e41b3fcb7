from fedrec.cli import main

main()
