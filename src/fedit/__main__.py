from fedit.cli import app

app()
