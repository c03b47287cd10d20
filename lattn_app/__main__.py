"""`python -m lattn_app` runs the `lattn` command."""

from lattn_app.cli import console_main

if __name__ == "__main__":
    console_main()
