DROP TABLE kser.waiters;
DROP TABLE kser.leases;
DROP TABLE kser.pools;
