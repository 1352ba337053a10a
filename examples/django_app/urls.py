from __future__ import annotations

from django.urls import path

from examples.django_app.orders import views

urlpatterns = [
    path("orders/", views.create_order),
    path("orders/<int:order_id>/", views.order_detail),
]
