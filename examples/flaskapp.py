"""A Flask application for spawnd-wsgi: `spawnd-wsgi --chdir examples flaskapp:app`."""
from flask import Flask, jsonify, request

app = Flask(__name__)


@app.route("/")
def index():
    return "Hello from Flask on spawnd-wsgi\n"


@app.route("/echo", methods=["GET", "POST"])
def echo():
    return jsonify(method=request.method, path=request.path, args=request.args,
                   form=request.form, script_root=request.script_root,
                   body=request.get_data(as_text=True) if not request.form else "")


@app.route("/hello/<name>")
def hello(name):
    return f"Hello, {name}!\n"
