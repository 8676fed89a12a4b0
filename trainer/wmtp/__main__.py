from wmtp.cli import app

app()
