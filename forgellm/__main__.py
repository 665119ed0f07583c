from forgellm.cli import main

main()
