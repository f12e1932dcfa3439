// Graphile Worker, the fastest PostgreSQL peer, run the way its documentation recommends for
// throughput: a local queue (jobs fetched in batches) and batched completions. Driven by
// bench/peer.rs, which installs it from npm into the bench's scratch folder.
//
//   node graphile.mjs migrate        create Graphile Worker's schema in DATABASE_URL
//   node graphile.mjs work           run until stdin closes; prints "ready" once it polls, and
//                                    "start <seconds>" per `latency` job (now minus the job's t)
import { run, runMigrations, Logger } from "graphile-worker";
import { createInterface } from "node:readline";

const connectionString = process.env.DATABASE_URL;
const concurrency = Number(process.env.GW_CONCURRENCY || 32);
const localQueue = Number(process.env.GW_LOCAL_QUEUE || 500);
const quiet = new Logger(() => (level, message) => {
  if (level === "error") console.error(message);
});

const mode = process.argv[2];
if (mode === "migrate") {
  await runMigrations({ connectionString, logger: quiet });
  process.exit(0);
}
if (mode !== "work") {
  console.error("usage: graphile.mjs migrate|work");
  process.exit(2);
}
const runner = await run({
  connectionString,
  concurrency,
  maxPoolSize: concurrency + 2,
  pollInterval: 1000,
  noHandleSignals: true,
  logger: quiet,
  taskList: {
    noop: async () => {},
    latency: async (payload) => {
      process.stdout.write(`start ${Date.now() / 1000 - payload.t}\n`);
    },
  },
  preset: {
    worker: {
      localQueue: { size: localQueue },
      completeJobBatchDelay: 0,
      failJobBatchDelay: 0,
    },
  },
});
process.stdout.write("ready\n");
createInterface({ input: process.stdin }).on("close", async () => {
  await runner.stop();
  process.exit(0);
});
await runner.promise;
