from embedforge.cli import main

main()
