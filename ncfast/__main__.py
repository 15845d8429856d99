from ncfast.cli import main

main(prog_name="ncfast")
