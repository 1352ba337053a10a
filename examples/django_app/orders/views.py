from __future__ import annotations

import json

from django.db import transaction
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods

from examples.django_app.orders.models import Order
from examples.django_app.tasks import confirm_order, enqueue_on_commit


@csrf_exempt
@require_http_methods(["POST"])
def create_order(request: HttpRequest) -> HttpResponse:
    item = json.loads(request.body or b"{}").get("item")
    if not item:
        return JsonResponse({"error": "item is required"}, status=400)
    with transaction.atomic():
        order = Order.objects.create(item=item)
        # Published after COMMIT: a worker that is fast never looks for a missing row.
        enqueue_on_commit(confirm_order, order_id=order.pk)
    return JsonResponse({"id": order.pk}, status=201)


def order_detail(request: HttpRequest, order_id: int) -> HttpResponse:
    order = Order.objects.filter(pk=order_id).first()
    if order is None:
        return JsonResponse({"error": "not found"}, status=404)
    return JsonResponse({"id": order.pk, "item": order.item, "confirmed": order.confirmed})
