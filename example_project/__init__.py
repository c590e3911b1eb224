"""A small site using django-satori: a member sign-up form synced to SATORI.

``python -m example_project.demo`` (or ``make demo``) runs all of it on a
laptop; ``python example_project/manage.py ...`` is its manage.py.
"""

from .celery import app as celery_app

__all__ = ["celery_app"]
