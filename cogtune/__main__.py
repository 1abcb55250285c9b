from cogtune.cli.app import main

main()
