from rapm.cli import main

main()
