"""Django settings for the example (``DJANGO_SETTINGS_MODULE=examples.django_app.settings``).

Stem reads its broker from ``STEM_BROKER_URL`` here, so the web process and the worker
(``stem worker start --app examples.django_app.tasks:app``) use the same one.
"""

from __future__ import annotations

import os
from pathlib import Path

BASE_DIR = Path(os.environ.get("DJANGO_APP_DIR", ".")).resolve()
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret")
DEBUG = True
ALLOWED_HOSTS = ["*"]
INSTALLED_APPS = ["examples.django_app.orders"]
ROOT_URLCONF = "examples.django_app.urls"
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3",
                         "NAME": os.environ.get("DJANGO_DB", str(BASE_DIR / "orders.sqlite3"))}}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True

#: Where Stem's tasks go (any Stem URL: redis://, postgresql://, sqlite:///...).
STEM_BROKER_URL = os.environ.get("STEM_BROKER_URL", "sqlite:///.stem/django_demo.db")
