"""The Andes gateway: the client-facing front end, gRPC (``andes.v1.GenerationService``) and an
OpenAI-compatible HTTP/SSE API, served by one process.

It validates requests, stores their payload in Redis, submits them to the scheduler, streams
each request's tokens from Redis to its client, and reports what every client has received
back to the scheduler (the buffer of unread tokens is what lets Andes pause a request safely).
Run it with ``python -m gateway``; the modules hold one concept each:

* ``validation`` - what a valid request is (pure);
* ``openai_request`` - OpenAI request bodies into valid requests (pure);
* ``chat`` - chat messages into a prompt (the chat template);
* ``tokens`` - counting prompt tokens;
* ``auth`` - optional API keys;
* ``payload`` - the request's payload hash in Redis;
* ``streams`` - one reader task fanning many Redis token streams out to requests;
* ``delivery`` - delivery progress batched onto the scheduler's ReportDelivery stream;
* ``scheduler`` - the scheduler client (Submit, Abort) and its error mapping;
* ``metrics`` - Prometheus metrics;
* ``service`` - the generation path both front ends share;
* ``grpc_api`` / ``http_api`` - the two front ends;
* ``grpc_events`` - grpc.aio's completion events reach the loop unthrottled (the scheduler
  uses it too);
* ``config`` / ``server`` / ``__main__`` - flags, assembly, health, drain.
"""
