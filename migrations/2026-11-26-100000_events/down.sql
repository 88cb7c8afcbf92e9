DROP TABLE kser.event_deliveries;
DROP TABLE kser.events;
