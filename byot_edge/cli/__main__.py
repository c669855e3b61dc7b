from byot_edge.cli import main

main()
