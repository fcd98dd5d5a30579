-- The clinic's four queues, in the engine's registry (reactor.queues, the
-- engine's line): public.enqueue, the RPC wrappers' checks, `reactor status`
-- and the dashboard read the queues from there, not from a list in SQL.
-- 031 created them in pgmq already; registering is idempotent.
SELECT reactor.register_queue(q)
  FROM unnest(ARRAY['email_queue', 'report_generation_queue',
                    'payment_processing_queue', 'analytics_queue']) AS q;
