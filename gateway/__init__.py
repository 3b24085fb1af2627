"""The Andes gateway: the client-facing gRPC front end (``andes.v1.GenerationService``).

It validates requests, stores their payload in Redis, submits them to the scheduler, streams
each request's tokens from Redis to its client, and reports what every client has received
back to the scheduler (the buffer of unread tokens is what lets Andes pause a request safely).
Run it with ``python -m gateway``; the modules hold one concept each:

* ``validation`` - what a valid request is (pure);
* ``tokens`` - counting prompt tokens;
* ``auth`` - optional API keys;
* ``payload`` - the request's payload hash in Redis;
* ``streams`` - one reader task fanning many Redis token streams out to requests;
* ``delivery`` - delivery progress batched onto the scheduler's ReportDelivery stream;
* ``scheduler`` - the scheduler client (Submit, Abort) and its error mapping;
* ``metrics`` - Prometheus metrics;
* ``service`` - the GenerationService servicer;
* ``config`` / ``server`` / ``__main__`` - flags, assembly, health, drain.
"""
