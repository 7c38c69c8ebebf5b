/// The API's own description (OpenAPI 3.1), served at `…/openapi.json`, and a page that shows it at
/// `…/docs` (Swagger UI, loaded by the reader's browser from a CDN; the master serves no script itself).
enum OpenAPIDocument {
    static func json(base: String) -> String {
        let base = base.replacing("\"", with: "")
        return """
            {"openapi":"3.1.0",
            "info":{"title":"nodepass master API","version":"1",
             "description":"Tunnels (instances) run by one nodepass master. Every endpoint but this document and /docs needs the header X-API-Key."},
            "servers":[{"url":"\(base)"}],
            "security":[{"ApiKeyAuth":[]}],
            "paths":{
             "/instances":{
              "get":{"summary":"Every instance; the first is the master's own record (id ********: url is the API key, config the master ID)","responses":{"200":{"description":"The instances","content":{"application/json":{"schema":{"type":"array","items":{"$ref":"#/components/schemas/Instance"}}}}},"401":{"$ref":"#/components/responses/Error"}}},
              "post":{"summary":"Makes an instance from a server:// or client:// URL and starts it","requestBody":{"required":true,"content":{"application/json":{"schema":{"$ref":"#/components/schemas/CreateInstanceRequest"}}}},"responses":{"201":{"description":"The new instance","content":{"application/json":{"schema":{"$ref":"#/components/schemas/Instance"}}}},"400":{"$ref":"#/components/responses/Error"},"401":{"$ref":"#/components/responses/Error"},"409":{"$ref":"#/components/responses/Error"}}}},
             "/instances/{id}":{
              "parameters":[{"name":"id","in":"path","required":true,"schema":{"type":"string"}}],
              "get":{"summary":"One instance","responses":{"200":{"description":"The instance","content":{"application/json":{"schema":{"$ref":"#/components/schemas/Instance"}}}},"401":{"$ref":"#/components/responses/Error"},"404":{"$ref":"#/components/responses/Error"}}},
              "patch":{"summary":"Changes the alias, the restart policy or the metadata, or starts, stops, restarts or resets (zeroes the counters of) the instance; on ******** the action restart makes a new API key","requestBody":{"content":{"application/json":{"schema":{"$ref":"#/components/schemas/UpdateInstanceRequest"}}}},"responses":{"200":{"description":"The instance after the change","content":{"application/json":{"schema":{"$ref":"#/components/schemas/Instance"}}}},"400":{"$ref":"#/components/responses/Error"},"401":{"$ref":"#/components/responses/Error"},"404":{"$ref":"#/components/responses/Error"}}},
              "put":{"summary":"Gives the instance a new URL and runs it with that URL","requestBody":{"required":true,"content":{"application/json":{"schema":{"$ref":"#/components/schemas/PutInstanceRequest"}}}},"responses":{"200":{"description":"The instance","content":{"application/json":{"schema":{"$ref":"#/components/schemas/Instance"}}}},"400":{"$ref":"#/components/responses/Error"},"401":{"$ref":"#/components/responses/Error"},"403":{"$ref":"#/components/responses/Error"},"404":{"$ref":"#/components/responses/Error"},"409":{"$ref":"#/components/responses/Error"}}},
              "delete":{"summary":"Stops and removes the instance","responses":{"204":{"description":"Removed"},"401":{"$ref":"#/components/responses/Error"},"403":{"$ref":"#/components/responses/Error"},"404":{"$ref":"#/components/responses/Error"}}}},
             "/events":{"get":{"summary":"Server-sent events named instance; data is an InstanceEvent: first one initial event per instance, then create, update, delete, log and shutdown","responses":{"200":{"description":"The stream","content":{"text/event-stream":{"schema":{"$ref":"#/components/schemas/InstanceEvent"}}}},"401":{"$ref":"#/components/responses/Error"},"503":{"$ref":"#/components/responses/Error"}}}},
             "/info":{
              "get":{"summary":"The master and its host","responses":{"200":{"description":"Information","content":{"application/json":{"schema":{"$ref":"#/components/schemas/MasterInfo"}}}},"401":{"$ref":"#/components/responses/Error"}}},
              "post":{"summary":"Changes the master's alias","requestBody":{"required":true,"content":{"application/json":{"schema":{"$ref":"#/components/schemas/UpdateMasterAliasRequest"}}}},"responses":{"200":{"description":"Information","content":{"application/json":{"schema":{"$ref":"#/components/schemas/MasterInfo"}}}},"400":{"$ref":"#/components/responses/Error"},"401":{"$ref":"#/components/responses/Error"}}}},
             "/tcping":{"get":{"summary":"Opens a TCP connection to target from the master's host","parameters":[{"name":"target","in":"query","required":true,"schema":{"type":"string"},"description":"HOST:PORT"}],"responses":{"200":{"description":"The result, also when the connection failed","content":{"application/json":{"schema":{"$ref":"#/components/schemas/TCPingResult"}}}},"400":{"$ref":"#/components/responses/Error"},"401":{"$ref":"#/components/responses/Error"}}}},
             "/openapi.json":{"get":{"summary":"This document","security":[],"responses":{"200":{"description":"OpenAPI 3.1","content":{"application/json":{}}}}}},
             "/docs":{"get":{"summary":"This document as a web page","security":[],"responses":{"200":{"description":"HTML","content":{"text/html":{}}}}}}},
            "components":{
             "securitySchemes":{"ApiKeyAuth":{"type":"apiKey","in":"header","name":"X-API-Key"}},
             "responses":{"Error":{"description":"Refused","content":{"application/json":{"schema":{"type":"object","required":["error"],"properties":{"error":{"type":"string"}}}}}}},
             "schemas":{
              "Instance":{"type":"object","required":["id","alias","type","status","url","config","restart","meta","mode","ping","pool","tcps","udps","tcprx","tcptx","udprx","udptx"],"properties":{
               "id":{"type":"string","description":"8 hex digits, or ******** for the master's record"},
               "alias":{"type":"string"},"type":{"type":"string","enum":["server","client",""]},
               "status":{"type":"string","enum":["running","stopped","error",""]},
               "url":{"type":"string","description":"The tunnel URL (with the master's log= when it had none); the API key on ********"},
               "config":{"type":"string","description":"The URL with every parameter spelled out; the master ID on ********"},
               "restart":{"type":"boolean","description":"Start again after a failure, with a growing pause"},
               "meta":{"$ref":"#/components/schemas/Meta"},
               "mode":{"type":"integer","description":"1 reverse, 2 forward, 0 not known"},
               "ping":{"type":"integer","description":"Not measured: always 0"},
               "pool":{"type":"integer","description":"Idle pool connections"},
               "tcps":{"type":"integer","description":"TCP connections relayed now"},"udps":{"type":"integer","description":"UDP flows now"},
               "tcprx":{"type":"integer","description":"TCP bytes from users towards the service"},"tcptx":{"type":"integer","description":"TCP bytes back to users"},
               "udprx":{"type":"integer"},"udptx":{"type":"integer"}}},
              "Meta":{"type":"object","properties":{"peer":{"$ref":"#/components/schemas/Peer"},"tags":{"type":"object","additionalProperties":{"type":"string"}}}},
              "Peer":{"type":"object","properties":{"sid":{"type":"string"},"type":{"type":"string"},"alias":{"type":"string"}}},
              "CreateInstanceRequest":{"type":"object","required":["url"],"properties":{"url":{"type":"string"},"alias":{"type":"string"}}},
              "UpdateInstanceRequest":{"type":"object","properties":{"alias":{"type":"string"},"action":{"type":"string","enum":["start","stop","restart","reset"]},"restart":{"type":"boolean"},"meta":{"$ref":"#/components/schemas/Meta"}}},
              "PutInstanceRequest":{"type":"object","required":["url"],"properties":{"url":{"type":"string"}}},
              "UpdateMasterAliasRequest":{"type":"object","required":["alias"],"properties":{"alias":{"type":"string"}}},
              "InstanceEvent":{"type":"object","properties":{"type":{"type":"string","enum":["initial","create","update","delete","log","shutdown"]},"time":{"type":"string","format":"date-time"},"instance":{"oneOf":[{"$ref":"#/components/schemas/Instance"},{"type":"null"}]},"logs":{"type":"string"}}},
              "MasterInfo":{"type":"object","properties":{"mid":{"type":"string"},"alias":{"type":"string"},"os":{"type":"string"},"arch":{"type":"string"},"cpu":{"type":"integer"},"mem_total":{"type":"integer"},"mem_used":{"type":"integer"},"swap_total":{"type":"integer"},"swap_used":{"type":"integer"},"netrx":{"type":"integer"},"nettx":{"type":"integer"},"diskr":{"type":"integer"},"diskw":{"type":"integer"},"sysup":{"type":"integer"},"ver":{"type":"string"},"name":{"type":"string"},"uptime":{"type":"integer"},"log":{"type":"string"},"tls":{"type":"string"},"crt":{"type":"string"},"key":{"type":"string","description":"The path of the API's TLS key file, not the API key"}}},
              "TCPingResult":{"type":"object","properties":{"target":{"type":"string"},"connected":{"type":"boolean"},"latency":{"type":"integer","description":"Milliseconds"},"error":{"type":["string","null"]}}}}}}
            """
    }

    static func html(base: String) -> String {
        let base = base.replacing("\"", with: "").replacing("<", with: "")
        return """
            <!doctype html>
            <html><head><meta charset="utf-8"><title>nodepass master API</title>
            <link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css"></head>
            <body><div id="api"><p>The API's description is at <a href="\(base)/openapi.json">\(base)/openapi.json</a>.</p></div>
            <script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
            <script>if (window.SwaggerUIBundle) { SwaggerUIBundle({url: "\(base)/openapi.json", dom_id: "#api"}); }</script>
            </body></html>
            """
    }
}
