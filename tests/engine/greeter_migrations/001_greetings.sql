-- The greeter: an app that exists only in tests/engine/test_an_app_of_its_own.py.
CREATE TABLE public.greetings (name text PRIMARY KEY, greeted_by bigint NOT NULL);
SELECT reactor.register_queue('greeting_queue');
