"""Web page (placeholder replaced below)."""
from flask import Blueprint

bp = Blueprint("web", __name__)
