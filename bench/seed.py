#!/usr/bin/python3
# The seed, as the blog post that started push-relay had it, rewritten for the benchmark:
# bottle's default server (wsgiref, one thread), and for every notification a fresh MQTT
# connection through paho's publish.single (QoS 0). Only the host/port arguments and the
# GET /_published counter (read by bench/throughput.mjs between rounds) are additions.
import json
import sys

import paho.mqtt.publish as publish
from bottle import get, post, request, run

HOST, PORT, BROKER_PORT = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
published = 0


@post('/api/v1/send_push')
def send_push():
    global published
    data = json.loads(request.body.read())
    publish.single('mm/_notif', data['message'], hostname='127.0.0.1', port=BROKER_PORT)
    published += 1
    return {'status': 'OK'}


@get('/_published')
def count():
    return {'published': published}


run(host=HOST, port=PORT, quiet=True)
