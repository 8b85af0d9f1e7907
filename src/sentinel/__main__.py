from sentinel.cli import app

app(prog_name="sentinel")
