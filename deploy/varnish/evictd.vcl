# Varnish in front of your application, purged by evictd by surrogate key.
#
# Needs the xkey vmod (Debian/Ubuntu: apt-get install varnish-modules).
# Your application tags each cacheable response with the surrogate keys of
# what it shows, space-separated, in an `xkey` header:
#
#   xkey: product-7 category-3
#
# and evictd, with a `[[purge]] kind = "varnish"` target pointing here, sends
#
#   PURGE / HTTP/1.1
#   xkey-purge: product-7 category-3      (xkey-softpurge with soft = true)
#
# after Redis applied the change, or `X-Evictd-Purge-All: 1` when it must
# purge everything (a surrogate key whose value it could not know, TRUNCATE).
vcl 4.1;

import xkey;

# Your application.
backend default {
    .host = "127.0.0.1";
    .port = "8080";
}

# Who may purge: the hosts evictd runs on.
acl evictd {
    "127.0.0.1";
    "::1";
}

sub vcl_recv {
    if (req.method == "PURGE") {
        if (client.ip !~ evictd) {
            return (synth(403, "Forbidden"));
        }
        if (req.http.X-Evictd-Purge-All) {
            ban("obj.status != 0");
            return (synth(200, "Purged everything"));
        }
        if (req.http.xkey-softpurge) {
            set req.http.n-gone = xkey.softpurge(req.http.xkey-softpurge);
        } else if (req.http.xkey-purge) {
            set req.http.n-gone = xkey.purge(req.http.xkey-purge);
        } else {
            return (synth(400, "No xkey-purge or xkey-softpurge header"));
        }
        return (synth(200, "Purged " + req.http.n-gone + " objects"));
    }
}
